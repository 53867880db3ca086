"""Several tasks on one base: a child network they share, each task's own part and head, and a delta each.

`choose` picks the shared and per-task child networks from every task's Fisher scores, `model` keeps one
backbone under a classifier per task and swaps each task's own values in, and `run` is the recipe that
`childtune train --tasks ...` runs."""
