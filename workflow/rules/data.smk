rule prepare_data:
    """Read the real data set once into uint8 train/test files (digits ship with scikit-learn)."""
    output:
        train=f"{OUT}/data/train.pt",
        test=f"{OUT}/data/test.pt",
        sidecar=f"{OUT}/data/prepare.json",
    params:
        script=f"{SCRIPTS}/prepare_data.py",
        dataset=DATASET,
        root=config["data"]["root"],
        download="--download" if config["data"]["download"] else "",
    log:
        f"{LOGS}/prepare_data.log",
    cache: True
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --dataset {params.dataset} --root {params.root} {params.download} "
        "--train-out {output.train} --test-out {output.test} --sidecar {output.sidecar} --log {log}"
