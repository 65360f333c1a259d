rule report:
    """report.md (score curve, chosen checkpoint, sample grid, images/s, accuracy table, accuracy against IPC,
    and the budget curve and sweep when on) and summary.json (the same figures as plain numbers). The report()
    outputs (and the score curve) are what `snakemake --report report.html` shows, with workflow/report/ captions."""
    input:
        best=rules.select_checkpoint.output.best,
        scores=rules.select_checkpoint.output.csv,
        curve=rules.select_checkpoint.output.plot,
        pool=f"{OUT}/samples/pool.pt",
        pool_meta=f"{OUT}/samples/pool.json",
        evaluations=expand(f"{OUT}/evaluation/{{kind}}.json", kind=ACCURACY_KINDS + NOAUG_KINDS),
        budget=expand(f"{OUT}/evaluation/{{kind}}.json", kind=BUDGET_KINDS),
        sweep_metas=expand(f"{OUT}/sweep/{{variant}}/pool.json", variant=list(SWEEP)),
        sweep_evaluations=expand(f"{OUT}/evaluation/{{kind}}.json", kind=SWEEP_KINDS),
    output:
        report=f"{OUT}/report.md",
        summary=f"{OUT}/summary.json",
        grid=report(f"{OUT}/sample_grid.png", caption="../report/sample_grid.rst", category="Samples"),
        accuracy=report(f"{OUT}/accuracy.tsv", caption="../report/accuracy.rst", category="Accuracy"),
        ipc_plot=report(f"{OUT}/ipc_grid.png", caption="../report/ipc_grid.rst", category="Accuracy"),
        **study_outputs(),
    params:
        script=f"{SCRIPTS}/report.py",
        dataset=DATASET,
        ipc=" ".join(map(str, IPC_GRID)),
        studies=lambda wildcards, input, output: study_args(input, output),
    log:
        f"{LOGS}/report.log",
    localrule: True
    threads: 1
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --dataset {params.dataset} --best {input.best} --scores {input.scores} "
        "--curve {input.curve} --pool {input.pool} --pool-meta {input.pool_meta} "
        "--evaluations {input.evaluations} --ipc {params.ipc} --report {output.report} "
        "--summary {output.summary} --grid {output.grid} --accuracy-table {output.accuracy} "
        "--ipc-plot {output.ipc_plot} {params.studies} --log {log}"
