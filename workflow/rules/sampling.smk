rule sample_budget:
    """As many class-balanced labelled images as the budget allows, with the best checkpoint's EMA
    weights; the clock starts at the first batch, after model loading."""
    input:
        best=rules.select_checkpoint.output.best,
        checkpoints=FINETUNE_CHECKPOINTS,
        **mode_inputs(config["sampler"]),
    output:
        pool=sampling_output("pt"),
        meta=sampling_output("json"),
    params:
        script=f"{SCRIPTS}/sample_budget.py",
        device=config["device"],
        settings=block_flags("sampling", "SamplingSettings"),
        sampler=sampler_args(config["sampler"]),
        seed=sampling_seed(),
        shard=lambda wildcards: f"--shard {wildcards.shard} --num-shards {SHARDS}" if SHARDS > 1 else "",
    log:
        f"{LOGS}/sample_budget{'_{shard}' if SHARDS > 1 else ''}.log",
    benchmark:
        f"{OUT}/benchmarks/sample_budget{'_{shard}' if SHARDS > 1 else ''}.tsv"
    priority: CRITICAL_PATH
    threads: CHAIN_THREADS
    resources:
        gpu=gpu_count(config["sampling"]),
        mem_mb=16000,
        runtime=config["sampling"]["runtime_min"],
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --best {input.best} --out {output.pool} --meta {output.meta} "
        "{params.settings} {params.sampler} "
        "{params.shard} --device {params.device} --seed {params.seed} --log {log}"


if SHARDS > 1:

    rule merge_samples:
        """Join the shards' pools; the summary adds up images and images/s and keeps each shard's."""
        input:
            pools=expand(f"{OUT}/samples/shards/shard_{{shard}}.pt", shard=range(SHARDS)),
            metas=expand(f"{OUT}/samples/shards/shard_{{shard}}.json", shard=range(SHARDS)),
        output:
            pool=f"{OUT}/samples/pool.pt",
            meta=f"{OUT}/samples/pool.json",
        params:
            script=f"{SCRIPTS}/merge_samples.py",
        log:
            f"{LOGS}/merge_samples.log",
        localrule: True
        conda:
            "../../envs/diffdistill.yaml"
        shell:
            "python {params.script} --shards {input.pools} --metas {input.metas} --out {output.pool} "
            "--meta {output.meta} --log {log}"


# One sampler variant of the sweep (config key sweep): sample_budget's command from the same checkpoint,
# with the same budget, batch size, cap and seed and the variant's sampler settings. One job per
# variant, so a cluster runs them side by side; off the critical path.
use rule sample_budget as sample_sweep with:
    input:
        unpack(lambda wildcards: mode_inputs(SWEEP[wildcards.variant])),
        best=rules.select_checkpoint.output.best,
        checkpoints=FINETUNE_CHECKPOINTS,
    output:
        pool=f"{OUT}/sweep/{{variant}}/pool.pt",
        meta=f"{OUT}/sweep/{{variant}}/pool.json",
    params:
        sampler=lambda wildcards: sampler_args(SWEEP[wildcards.variant]),
        shard="",
    log:
        f"{LOGS}/sweep/{{variant}}.log",
    benchmark:
        f"{OUT}/benchmarks/sweep/{{variant}}.tsv"
    priority: 0
