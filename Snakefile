# diffdistill: distil a labelled image data set into a small synthetic one with a class-conditional
# U-ViT diffusion model. `snakemake --cores all` runs the embedded default (scikit-learn digits);
# `--configfile config/cifar100.yaml` or `config/tinyimagenet.yaml` runs the paper's settings.
from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "config/config.yaml"


validate(config, schema="workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/scoring.smk"
include: "workflow/rules/sampling.smk"
include: "workflow/rules/package.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/external.smk"
include: "workflow/rules/report.smk"


rule all:
    localrule: True
    input:
        final_targets(),
