"""Learning curves of a pair, every method overlaid: snakemake → kdbench.summary."""

from kdbench.jobs import run_job
from kdbench.summary import learning_curves_overlay

w = snakemake.wildcards
run_job(
    learning_curves_overlay,
    snakemake.log[0],
    paths=list(snakemake.input.runs),
    path=snakemake.output.chart,
    title=f"{w.dataset}: {w.teacher} → {w.student}",
)
