# Plain-SGD sharpness at initialization per (r, seed): where the eta grid sits relative to
# the edge of stability 2 / lambda_0 (src/beyond_eos/calibrate.py, docs/theory.md §5).


rule calibrate:
    input:
        rules.mnist.output,
    output:
        report(
            out("results/calibration.csv"),
            caption="../report/calibration.rst",
            category="Tables",
        ),
    params:
        py=PY,
        config=shlex.quote(json.dumps(config, sort_keys=True)),
    log:
        out("logs/calibrate.log"),
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "{params.py} -m beyond_eos.calibrate --config-json {params.config} --out {output}"
        " > {log} 2>&1"
