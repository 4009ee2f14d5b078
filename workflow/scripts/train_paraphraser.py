"""Train FT's paraphraser: snakemake input/params/output/log → ft.train_paraphraser."""

from kdbench.jobs import run_job
from kdbench.methods.ft import train_paraphraser

run_job(
    train_paraphraser,
    snakemake.log[0],
    threads=snakemake.threads,
    gpu=True,
    dataset=snakemake.wildcards.dataset,
    teacher=snakemake.wildcards.teacher,
    seed=int(snakemake.wildcards.seed),
    teacher_weights=snakemake.input.teacher,
    data=snakemake.params.data,
    train=snakemake.params.train,
    params=snakemake.params.ft,
    state=snakemake.params.state,
    outputs=dict(snakemake.output.items()),
)
