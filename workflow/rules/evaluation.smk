def evaluation_inputs(wildcards):
    """What the ConvNet trains on for each of the four rows of the accuracy table."""
    real = {"test": f"{OUT}/data/test.pt", "real_train": f"{OUT}/data/train.pt"}
    train = {
        "synthetic_ipc": rules.package.output.package,
        "synthetic_pool": rules.sample_budget.output.pool,
        "real_ipc": f"{OUT}/data/train.pt",
        "real_full": f"{OUT}/data/train.pt",
    }[wildcards.kind]
    return {"train": train, **real}


def evaluation_args(wildcards):
    ipc = config["package"]["ipc"]
    ev = config["evaluation"]
    return {
        "synthetic_ipc": f"--train-format package --ipc {ipc} --epochs {ev['epochs']}",
        "synthetic_pool": f"--train-format images --epochs {ev['pool_epochs']}",
        "real_ipc": f"--train-format images --random-ipc {ipc} --epochs {ev['epochs']}",
        "real_full": f"--train-format images --epochs {ev['pool_epochs']}",
    }[wildcards.kind]


rule evaluate:
    """The challenge protocol: train the ConvNet (DSA, SGD) on one training set, test on real data."""
    input:
        unpack(evaluation_inputs),
    output:
        result=f"{OUT}/evaluation/{{kind}}.json",
    params:
        args=evaluation_args,
        rounds=config["evaluation"]["rounds"],
        batch_size=config["evaluation"].get("batch_size", 256),
        seed=config["seed"] + 5,
    log:
        f"{LOGS}/evaluate/{{kind}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate/{{kind}}.tsv"
    threads: 1
    resources:
        gpu=gpu_count(),
        mem_mb=16000,
        runtime=240,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "{PYTHON} {SCRIPTS}/evaluate.py --train {input.train} {params.args} --test {input.test} "
        "--dataset {DATASET} --real-train {input.real_train} --rounds {params.rounds} "
        "--batch-size {params.batch_size} --device {config[device]} --seed {params.seed} "
        "--out {output.result} --log {log}"
