# Per-run summaries -> results/summary.csv and the tables (src/beyond_eos/aggregate.py).


rule aggregate:
    input:
        runs=expand("{d}/{f}", d=run_dirs(), f=["metrics.csv", "summary.json", "config.json"]),
    output:
        summary=report(
            out("results/summary.csv"), caption="../report/summary.rst", category="Tables"
        ),
        tables=[
            report(
                out(f"results/tables/{t}.{ext}"), caption=f"../report/{t}.rst", category="Tables"
            )
            for t in ("table1", "table2", "table3")
            for ext in ("csv", "md", "tex")
        ],
    params:
        py=PY,
        runs=run_dirs(),
        out=out("results"),
    log:
        out("logs/aggregate.log"),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} -m beyond_eos.aggregate --runs {params.runs} --out {params.out} > {log} 2>&1"
