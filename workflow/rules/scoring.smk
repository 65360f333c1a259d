rule reference_stats:
    """Feature statistics of the real training split, once per data set: InceptionV3 pool features
    (FID) or the features of the evaluation ConvNet trained on the real data (FD-ConvNet)."""
    input:
        train=f"{OUT}/data/train.pt",
    output:
        stats=f"{OUT}/scoring/reference_stats.npz",
        **feature_convnet_output(),
    params:
        script=f"{SCRIPTS}/reference_stats.py",
        device=config["device"],
        settings=block_flags("scoring", "ReferenceSettings"),
        convnet_out=lambda wildcards, output: f"--convnet-out {output.convnet}" if "convnet" in output.keys() else "",
        seed=stage_seed("reference_stats"),
    log:
        f"{LOGS}/reference_stats.log",
    cache: True
    priority: CRITICAL_PATH
    threads: CHAIN_THREADS
    resources:
        gpu=gpu_count(config["scoring"]),
        mem_mb=16000,
        runtime=120,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --real-train {input.train} {params.settings} {params.convnet_out} "
        "--stats-out {output.stats} --device {params.device} --seed {params.seed} --log {log}"


rule score_checkpoint:
    """Sample a fixed number of images (same noise for every checkpoint) with the EMA weights of one
    checkpoint and compute their Fréchet distance to the real statistics. One job per checkpoint."""
    input:
        checkpoint=f"{OUT}/checkpoints/step_{{step}}.pt",
        stats=rules.reference_stats.output.stats,
        **feature_convnet_output(),
        **mode_inputs(SCORING_SAMPLER),
    output:
        score=f"{OUT}/scoring/step_{{step}}.json",
    params:
        script=f"{SCRIPTS}/score_checkpoint.py",
        device=config["device"],
        settings=f"{block_flags('scoring', 'ReferenceSettings')} {block_flags('scoring', 'ScoringSettings')}",
        convnet=lambda wildcards, input: f"--convnet {input.convnet}" if "convnet" in input.keys() else "",
        sampler=sampler_args(SCORING_SAMPLER),
        seed=stage_seed("score_checkpoint"),
    log:
        f"{LOGS}/score_checkpoint/step_{{step}}.log",
    benchmark:
        f"{OUT}/benchmarks/score_checkpoint/step_{{step}}.tsv"
    priority: CRITICAL_PATH
    threads: CHAIN_THREADS
    resources:
        gpu=gpu_count(config["scoring"]),
        mem_mb=16000,
        runtime=120,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --checkpoint {input.checkpoint} --stats {input.stats} "
        "{params.settings} {params.convnet} {params.sampler} "
        "--device {params.device} --seed {params.seed} --out {output.score} --log {log}"


rule select_checkpoint:
    """The score curve (the paper's Fig. 3), a CSV of step -> score, and the best checkpoint."""
    input:
        scores=[f"{OUT}/scoring/step_{step:07d}.json" for step in training_steps(config["finetune"])],
    output:
        csv=f"{OUT}/scoring/scores.csv",
        best=f"{OUT}/scoring/best.json",
        plot=report(f"{OUT}/scoring/score_curve.png", caption="../report/score_curve.rst",
                    category="Checkpoint selection"),
    params:
        script=f"{SCRIPTS}/select_checkpoint.py",
    log:
        f"{LOGS}/select_checkpoint.log",
    localrule: True
    priority: CRITICAL_PATH
    threads: CHAIN_THREADS  # a plot, but it holds the cores for sampling (common.smk)
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --scores {input.scores} --csv {output.csv} "
        "--best {output.best} --plot {output.plot} --log {log}"
