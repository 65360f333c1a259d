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
