# One job per grid point (r, scaling, eta, seed). A diverged run is a result, not a failure.


rule train:
    input:
        rules.mnist.output,
    output:
        summary=f"{RUN}/summary.json",
        metrics=f"{RUN}/metrics.csv",
        instruments=f"{RUN}/instruments.npz",
        config=f"{RUN}/config.json",
    params:
        py=PY,
        run=run_json,
        out=RUN,
    threads: config["train"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=lambda wc: 1 if config["train"]["device"] == "cuda" else 0,
    log:
        out(f"logs/train/{RUN_ID}.log"),
    benchmark:
        out(f"logs/benchmarks/train/{RUN_ID}.tsv")
    shell:
        "{params.py} -m beyond_eos.train --run-config {params.run} --out {params.out}"
        " > {log} 2>&1"
