# The challenge submission made from the budgeted pool, and a package for each other IPC of the grid.


rule package:
    """The challenge submission at SUBMISSION_IPC: class-major IPC blocks, normalised, validated; plus the whole pool."""
    input:
        pool=f"{OUT}/samples/pool.pt",
        train=f"{OUT}/data/train.pt",
        **package_convnet(),
    output:
        package=package_file(SUBMISSION_IPC),
        pool=f"{OUT}/package/pool_normalized.pt",
        meta=f"{OUT}/package/package.json",
    params:
        script=f"{SCRIPTS}/package.py",
        dataset=DATASET,
        ipc=SUBMISSION_IPC,
        settings=block_flags("package", "PackageSettings"),
        out_dir=lambda wildcards, output: str(Path(output.package).parent),
        convnet=lambda wildcards, input: f"--feature-convnet {input.convnet}" if "convnet" in input.keys() else "",
        pool_out=lambda wildcards, output: f"--pool-out {output.pool}" if "pool" in output.keys() else "",
    log:
        f"{LOGS}/package.log",
    priority: CRITICAL_PATH
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --pool {input.pool} --dataset {params.dataset} --ipc {params.ipc} "
        "{params.settings} {params.convnet} --real-train {input.train} --out-dir {params.out_dir} "
        "{params.pool_out} --meta {output.meta} --log {log}"


use rule package as package_ipc with:
    """The package of another IPC of the grid, in package/ipc<n>/: the same rule, without the whole pool."""
    output:
        package=f"{OUT}/package/ipc{{ipc}}/{DATASET}.pt",
        meta=f"{OUT}/package/ipc{{ipc}}/package.json",
    wildcard_constraints:
        ipc=r"\d+",
    params:
        ipc=lambda wildcards: wildcards.ipc,
    log:
        f"{LOGS}/package/ipc{{ipc}}.log",


rule datasheet:
    """The submission's datasheet: a record (datasheet.json) and a card (datasheet.md) of what made the package
    and how good it is (accuracy against random real of its IPC, the field's scores), with a picture grid."""
    input:
        unpack(datasheet_inputs),
    output:
        record=f"{OUT}/package/datasheet.json",
        card=f"{OUT}/package/datasheet.md",
        grid=f"{OUT}/package/datasheet.png",
    params:
        script=f"{SCRIPTS}/datasheet.py",
        args=datasheet_args,
        seed=config["seed"],
    log:
        f"{LOGS}/datasheet.log",
    localrule: True  # seconds of work: on a cluster, not worth a job's queueing
    threads: 1
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} {params.args} --seed {params.seed} --out {output.record} --card {output.card} "
        "--grid {output.grid} --log {log}"


use rule datasheet as datasheet_ipc with:
    """The datasheet of another IPC's package, in package/ipc<n>/."""
    output:
        record=f"{OUT}/package/ipc{{ipc}}/datasheet.json",
        card=f"{OUT}/package/ipc{{ipc}}/datasheet.md",
        grid=f"{OUT}/package/ipc{{ipc}}/datasheet.png",
    wildcard_constraints:
        ipc=r"\d+",
    log:
        f"{LOGS}/datasheet/ipc{{ipc}}.log",


rule export_images:
    """The submission as an image folder (images/train/<class>/<index>.png, 8-bit): torchvision's ImageFolder
    layout, readable as a set you bring (config key external)."""
    input:
        package=package_file(SUBMISSION_IPC),
        meta=f"{OUT}/package/package.json",
    output:
        folder=directory(f"{OUT}/package/images"),
    params:
        script=f"{SCRIPTS}/export_images.py",
    log:
        f"{LOGS}/export_images.log",
    localrule: True  # seconds of work: on a cluster, not worth a job's queueing
    threads: 1
    conda:
        "../../envs/diffdistill.yaml"
    shell:
        "python {params.script} --package {input.package} --meta {input.meta} --out {output.folder} --log {log}"


use rule export_images as export_images_ipc with:
    """The image folder of another IPC's package, in package/ipc<n>/images."""
    input:
        package=f"{OUT}/package/ipc{{ipc}}/{DATASET}.pt",
        meta=f"{OUT}/package/ipc{{ipc}}/package.json",
    output:
        folder=directory(f"{OUT}/package/ipc{{ipc}}/images"),
    wildcard_constraints:
        ipc=r"\d+",
    log:
        f"{LOGS}/export_images/ipc{{ipc}}.log",
