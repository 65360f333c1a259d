rule report:
    """report.md (score curve, chosen checkpoint, sample grid, images/s, accuracy table) and
    summary.json (the same figures as plain numbers)."""
    input:
        best=rules.select_checkpoint.output.best,
        scores=rules.select_checkpoint.output.csv,
        curve=rules.select_checkpoint.output.plot,
        pool=f"{OUT}/samples/pool.pt",
        pool_meta=f"{OUT}/samples/pool.json",
        evaluations=expand(f"{OUT}/evaluation/{{kind}}.json", kind=ACCURACY_KINDS),
    output:
        report=f"{OUT}/report.md",
        summary=f"{OUT}/summary.json",
        grid=f"{OUT}/sample_grid.png",
    params:
        script=f"{SCRIPTS}/report.py",
        dataset=DATASET,
        ipc=config["package"]["ipc"],
    log:
        f"{LOGS}/report.log",
    localrule: True
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --dataset {params.dataset} --best {input.best} --scores {input.scores} "
        "--curve {input.curve} --pool {input.pool} --pool-meta {input.pool_meta} "
        "--evaluations {input.evaluations} --ipc {params.ipc} --report {output.report} "
        "--summary {output.summary} --grid {output.grid} --log {log}"
