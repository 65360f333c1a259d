rule pretrain_unconditional:
    """Train an unconditional U-ViT on the real data: the stand-in for a public unconditional
    checkpoint (like CIFAR-10 U-ViT-S/2) when no public weights exist (the digits default)."""
    input:
        data=f"{OUT}/data/train.pt",
    output:
        checkpoints=checkpoint_files("pretrain", PRETRAINING),
        sidecar=f"{OUT}/pretrain/train.json",
    params:
        script=f"{SCRIPTS}/train.py",
        device=config["device"],
        preset=PRETRAIN_PRESET,
        overrides=json.dumps(config["model"]["overrides"]),
        start="--num-classes 0",
        args=training_args(PRETRAINING),
        launcher=launcher(PRETRAINING),
        resume_dir=resume_dir("pretrain", "pretrain_unconditional"),
        seed=stage_seed("pretrain_unconditional"),
    log:
        f"{LOGS}/pretrain_unconditional.log",
    benchmark:
        f"{OUT}/benchmarks/pretrain_unconditional.tsv"
    priority: CRITICAL_PATH
    threads: CHAIN_THREADS
    resources:
        gpu=gpu_count(PRETRAINING),
        mem_mb=PRETRAINING["mem_mb"],
        runtime=PRETRAINING["runtime_min"],
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "{params.launcher} {params.script} --data {input.data} --preset {params.preset} "
        "--model-overrides '{params.overrides}' {params.start} {params.args} "
        "--checkpoints {output.checkpoints} --resume-dir {params.resume_dir} --seed {params.seed} --device {params.device} "
        "--sidecar {output.sidecar} --log {log}"


# Class-conditional fine-tuning from the pretrained weights (label layer excluded), with the same command
# as pre-training and its own block; resumable: a rerun continues from the newest complete checkpoint.
use rule pretrain_unconditional as finetune with:
    input:
        data=f"{OUT}/data/train.pt",
        init=pretrained_weights(),
    output:
        checkpoints=FINETUNE_CHECKPOINTS,
        sidecar=f"{OUT}/checkpoints/train.json",
    params:
        preset=config["model"]["preset"],
        start=lambda wildcards, input: f"--init {input.init}" if input.init else "",
        args=training_args(config["finetune"]),
        launcher=launcher(config["finetune"]),
        resume_dir=resume_dir("checkpoints", "finetune"),
        seed=stage_seed("finetune"),
    log:
        f"{LOGS}/finetune.log",
    benchmark:
        f"{OUT}/benchmarks/finetune.tsv"
    resources:
        gpu=gpu_count(config["finetune"]),
        mem_mb=config["finetune"]["mem_mb"],
        runtime=config["finetune"]["runtime_min"],
