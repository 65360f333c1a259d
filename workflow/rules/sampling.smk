rule sample_budget:
    """As many class-balanced labelled images as the budget allows, with the best checkpoint's EMA
    weights; the clock starts at the first batch, after model loading."""
    input:
        best=rules.select_checkpoint.output.best,
        checkpoints=FINETUNE_CHECKPOINTS,
    output:
        pool=f"{OUT}/samples/pool.pt",
        meta=f"{OUT}/samples/pool.json",
    params:
        script=f"{SCRIPTS}/sample_budget.py",
        device=config["device"],
        budget=config["sampling"]["budget_s"],
        batch_size=config["sampling"]["batch_size"],
        max_images=(
            f"--max-images {config['sampling']['max_images']}" if config["sampling"].get("max_images") else ""
        ),
        sampler=sampler_args(config["sampler"]),
        seed=config["seed"] + 4,
    log:
        f"{LOGS}/sample_budget.log",
    benchmark:
        f"{OUT}/benchmarks/sample_budget.tsv"
    threads: workflow.cores
    resources:
        gpu=gpu_count(),
        mem_mb=16000,
        runtime=config["sampling"].get("runtime_min", 30),
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --best {input.best} --out {output.pool} --meta {output.meta} "
        "--budget-s {params.budget} --batch-size {params.batch_size} {params.max_images} {params.sampler} "
        "--device {params.device} --seed {params.seed} --log {log}"


rule package:
    """The challenge submission: class-major IPC blocks, normalised, validated; plus the whole pool."""
    input:
        pool=rules.sample_budget.output.pool,
        train=f"{OUT}/data/train.pt",
    output:
        package=f"{OUT}/package/{DATASET}.pt",
        pool=f"{OUT}/package/pool_normalized.pt",
        meta=f"{OUT}/package/package.json",
    params:
        script=f"{SCRIPTS}/package.py",
        dataset=DATASET,
        ipc=config["package"]["ipc"],
        rule=config["package"]["rule"],
        out_dir=lambda wildcards, output: str(Path(output.package).parent),
    log:
        f"{LOGS}/package.log",
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --pool {input.pool} --dataset {params.dataset} --ipc {params.ipc} "
        "--rule {params.rule} --real-train {input.train} --out-dir {params.out_dir} "
        "--pool-out {output.pool} --meta {output.meta} --log {log}"
