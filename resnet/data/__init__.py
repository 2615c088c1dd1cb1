"""Datasets: sources (where images come from), prepare (split, manifest, write), loading (torch side).

`prepare` and `sources` need only numpy and Pillow; `loading` and `augment` need torch.
"""
