"""The measured choice and INT8, above the runtimes: what needs the daemon's own Runner.

- `tune`: `model.runtime`/`model.precision` = "auto" on CPUs, timed on the machine, gated on accuracy;
- `int8`: NNCF's post-training quantization of the OpenVINO export, on the user's images;
- `gate`: the accuracy gate against fp32;
- `__main__`: the exporter's child process (`python -m daemon.tuning [tune] '<json>'`).
"""
