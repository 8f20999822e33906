"""The measured choice and INT8, above the runtimes: what needs the daemon's own Runner.

- `tune`: `model.runtime`/`model.precision` = "auto" on CPUs, timed on the machine, gated on accuracy;
- `timing`: the timing processes (a candidate loaded once per layout, timed per batch size);
- `node`: a Ray node's own export and measured choice, run by its device actor before it loads;
- `int8`: NNCF's post-training quantization of the OpenVINO export, on the user's images;
- `gate`: the accuracy gate against fp32;
- `__main__`: the exporter's child process (`python -m daemon.tuning [tune] '<json>'`).
"""
