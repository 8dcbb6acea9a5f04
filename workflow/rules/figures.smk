# Figure 1 (normalized), S1 (none), S2 (relative) and Figure 2 (Taylor check), from the runs.


rule figures:
    input:
        summary=out("results/summary.csv"),
        runs=expand("{d}/{f}", d=run_dirs(), f=["metrics.csv", "summary.json", "config.json"]),
    output:
        [
            report(out(f"figures/{f}.{ext}"), caption=f"../report/{f}.rst", category="Figures")
            for f in figure_names(config)
            for ext in ("pdf", "png")
        ],
    params:
        py=PY,
        runs=run_dirs(),
        smooth=config["figures"]["smooth"],
        dpi=config["figures"]["dpi"],
        out=out("figures"),
    log:
        out("logs/figures.log"),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} -m beyond_eos.figures --runs {params.runs} --summary {input.summary}"
        " --out {params.out} --smooth {params.smooth} --dpi {params.dpi} > {log} 2>&1"
