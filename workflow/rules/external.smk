# Distilled sets you bring (config key external): each is read and checked, then evaluated like a package
# of its IPC beside random real subsets of that IPC; the report gives the field's scores. Nothing of
# fine-tuning or sampling runs for them.


rule external_set:
    """Read one set (a challenge-layout file or a folder of class folders), check it against the data set
    before any training, and write it as the normalised class-major tensor the evaluation trains on."""
    input:
        source=lambda wildcards: EXTERNAL[wildcards.name],
        test=f"{OUT}/data/test.pt",
        real_train=f"{OUT}/data/train.pt",
    output:
        images=f"{OUT}/external/{{name}}/set.pt",
        record=f"{OUT}/external/{{name}}/set.json",
    wildcard_constraints:
        name="|".join(map(re.escape, EXTERNAL)) or "(?!)",
    params:
        script=f"{SCRIPTS}/external_set.py",
        dataset=DATASET,
    log:
        f"{LOGS}/external_set/{{name}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --source {input.source} --name {wildcards.name} --dataset {params.dataset} "
        "--test {input.test} --real-train {input.real_train} --out {output.images} --record {output.record} "
        "--log {log}"


rule external_report:
    """One result.json per set, summary.json and report.md: each set's accuracy beside random real of its IPC,
    and the field's scores (HLR, IOR, LRS, ARS)."""
    input:
        unpack(external_report_inputs),
    output:
        results=[f"{OUT}/external/{name}/result.json" for name in EXTERNAL],
        summary=f"{OUT}/external/summary.json",
        report=f"{OUT}/external/report.md",
    params:
        script=f"{SCRIPTS}/external_report.py",
        dataset=DATASET,
        noaug=lambda wildcards, input: (f"--evaluations-noaug {' '.join(input.evaluations_noaug)} "
                                        f"--random-real-noaug {' '.join(input.random_real_noaug)}"
                                        if config["evaluation"]["ars"] else ""),
    log:
        f"{LOGS}/external_report.log",
    localrule: True
    threads: 1
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --dataset {params.dataset} --sets {input.sets} --evaluations {input.evaluations} "
        "--random-real {input.random_real} {params.noaug} --full-real {input.full_real} "
        "--results {output.results} --summary {output.summary} --report {output.report} --log {log}"
