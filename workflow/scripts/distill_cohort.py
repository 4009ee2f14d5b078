"""Train a cohort of students on one teacher pass: snakemake → kdbench.runs.train_cohort."""

from kdbench.jobs import run_job
from kdbench.runs import train_cohort

run_job(
    train_cohort,
    snakemake.log[0],
    threads=snakemake.threads,
    gpu=True,
    name=snakemake.params.name,
    dataset=snakemake.wildcards.dataset,
    teacher=snakemake.wildcards.teacher,
    teacher_weights=snakemake.input.teacher,
    seed=int(snakemake.wildcards.seed),
    members=snakemake.params.members,
    data=snakemake.params.data,
    train=snakemake.params.train,
    state=snakemake.params.state,
)
