# Students: dataset × teacher → student × method × variant × seed. Teacher-free methods
# (vanilla) use the teacher name "none", so each such student trains once per seed. With
# `cohort_size` N > 0 the students that learn from a teacher train N to a job instead
# (distill_cohort, one teacher pass per batch for all of them), and each is then linked (or copied) from
# the cohort's directory to its own (cohort_member); `distill` trains only the vanilla ones.


rule distill:
    input:
        unpack(method_assets),
        teacher=teacher_checkpoint,
    output:
        **student_outputs(),
    log:
        f"{LOG_DIR}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}-{{variant}}-seed{{seed}}.log",
    benchmark:
        f"{STUDENT_DIR}/benchmark.tsv"
    wildcard_constraints:
        teacher="none" if COHORTS else "resnet[0-9]+|none",
    # a SLURM run may submit several students to one job, run in turn (profiles/slurm)
    group:
        "students"
    conda:
        "../envs/kdbench.yaml"
    threads: TRAIN_THREADS
    # one training run's share of a GPU: `--resources gpu_runs=N` lets N run at once
    resources:
        gpu_runs=1,
    params:
        data=data_params,
        train=kdconfig.train_params(config, "student"),
        method_params=method_params,
        state=f"{STATE_DIR}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}/{{variant}}/seed{{seed}}.pt",
    script:
        "../scripts/distill.py"


if COHORTS:

    rule distill_cohort:
        input:
            unpack(cohort_inputs),
        output:
            directory(COHORT_DIR),
        log:
            f"{LOG_DIR}/{{dataset}}/cohorts/{{teacher}}-seed{{seed}}-c{{cohort}}.log",
        benchmark:
            f"{COHORT_DIR}.benchmark.tsv"
        wildcard_constraints:
            teacher="resnet[0-9]+",
        conda:
            "../envs/kdbench.yaml"
        threads: TRAIN_THREADS
        # one training process on a GPU, however many students it trains
        resources:
            gpu_runs=1,
        params:
            name=lambda wildcards: cohort_job(wildcards).name,
            data=data_params,
            train=kdconfig.train_params(config, "student"),
            members=cohort_members,
            state=f"{STATE_DIR}/{{dataset}}/cohorts/{{teacher}}-seed{{seed}}/c{{cohort}}.pt",
        script:
            "../scripts/distill_cohort.py"

    rule cohort_member:
        input:
            cohort_member_source,
        output:
            **student_outputs(),
        log:
            f"{LOG_DIR}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}-{{variant}}-seed{{seed}}.log",
        wildcard_constraints:
            teacher="resnet[0-9]+",
        localrule: True
        conda:
            "../envs/kdbench.yaml"
        params:
            member="{student}/{method}/{variant}",
        script:
            "../scripts/cohort_member.py"
