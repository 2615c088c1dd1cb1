"""Datasets: where images come from, how they are prepared, and how training reads them.

- sources: the registry of sources (digits, fractals, cifar10/100, imagefolder) and `RawDataset`;
  fractals, cifar, imagefolder: the sources themselves; images: decode, convert to RGB, resize, reject;
  s3: boto3 access (listing, parallel reads, downloads, one-line errors).
- prepare: stratified split, Parquet shards, manifest, atomic write.
- loading (torch): prepared splits in memory, sharded batches; augment (torch): batched augmentation.

`prepare`, `sources` and `images` need only numpy, Pillow and pyarrow; `loading` and `augment` need torch.
"""
