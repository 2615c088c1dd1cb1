"""The DVC stages, one short module each: read params.yaml, call the library, write the declared outputs.

Run one with `python -m pipelines.<stage>` (what dvc.yaml does) or `resnet-pipeline <stage>`.
"""
