# The challenge submission made from the budgeted pool.


rule package:
    """The challenge submission: class-major IPC blocks, normalised, validated; plus the whole pool."""
    input:
        pool=f"{OUT}/samples/pool.pt",
        train=f"{OUT}/data/train.pt",
        **package_convnet(),
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
        convnet=lambda wildcards, input: f"--feature-convnet {input.convnet}" if "convnet" in input.keys() else "",
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
        "--rule {params.rule} {params.convnet} --real-train {input.train} --out-dir {params.out_dir} "
        "--pool-out {output.pool} --meta {output.meta} --log {log}"
