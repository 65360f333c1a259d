rule prepare_data:
    """Read the real data set once into uint8 train/test files (digits ship with scikit-learn); a folder
    data set is checked against the IPCs and the networks first, so bad input stops the run here."""
    output:
        train=f"{OUT}/data/train.pt",
        test=f"{OUT}/data/test.pt",
        sidecar=f"{OUT}/data/prepare.json",
    params:
        script=f"{SCRIPTS}/prepare_data.py",
        dataset=DATASET,
        root=config["data"]["root"],
        download="--download" if config["data"]["download"] else "",
        **folder_prepare_params(),
    log:
        f"{LOGS}/prepare_data.log",
    cache: True
    threads: 2 if DATASET == "folder" else 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --dataset {params.dataset} --root {params.root} {params.download} "
        + ("{params.folder} --workers {threads} " if DATASET == "folder" else "")
        + "--train-out {output.train} --test-out {output.test} --sidecar {output.sidecar} --log {log}"
