rule evaluate:
    """The challenge protocol: train the ConvNet (DSA, SGD) on one training set, test on real data."""
    input:
        unpack(evaluation_inputs),
    output:
        result=f"{OUT}/evaluation/{{kind}}.json",
    wildcard_constraints:
        kind=EVALUATION_KIND_RE,
    params:
        script=f"{SCRIPTS}/evaluate.py",
        device=config["device"],
        dataset=DATASET,
        args=evaluation_args,
        settings=block_flags("evaluation", "EvaluationSettings"),
        seed=stage_seed("evaluate"),
        # Outside the outputs (Snakemake deletes those before a rerun); used only for the same settings and data.
        resume=lambda wildcards: resume_dir("evaluation", wildcards.kind),
    log:
        f"{LOGS}/evaluate/{{kind}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate/{{kind}}.tsv"
    priority: evaluation_priority
    threads: 1
    resources:
        gpu=gpu_count(config["evaluation"]),
        mem_mb=16000,
        runtime=240,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --train {input.train} {params.args} --test {input.test} "
        "--dataset {params.dataset} --real-train {input.real_train} {params.settings} "
        "--device {params.device} --seed {params.seed} "
        "--resume-dir {params.resume} --out {output.result} --log {log}"
