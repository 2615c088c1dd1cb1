"""resnet-pipeline: ResNets from scratch, trained with Ray, tracked in MLflow, versioned with DVC."""

__version__ = "0.1.0"
