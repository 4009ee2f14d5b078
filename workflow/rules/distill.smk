# Students: dataset × teacher → student × method × variant × seed. Teacher-free methods
# (vanilla) use the teacher name "none", so each such student trains once per seed.


rule distill:
    input:
        unpack(method_assets),
        teacher=teacher_checkpoint,
    output:
        metrics=f"{STUDENT_DIR}/metrics.json",
        final_weights=f"{STUDENT_DIR}/model_final.pt",
        best_weights=f"{STUDENT_DIR}/model_best.pt",
        loss_plot=report(
            f"{STUDENT_DIR}/Loss.png",
            caption="../report/loss_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "{teacher} → {student}",
                "method": "{method} {variant}",
                "seed": "{seed}",
            },
        ),
        accuracy_plot=report(
            f"{STUDENT_DIR}/Accuracy.png",
            caption="../report/accuracy_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "{teacher} → {student}",
                "method": "{method} {variant}",
                "seed": "{seed}",
            },
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/students/{{teacher}}-{{student}}/{{method}}-{{variant}}-seed{{seed}}.log",
    benchmark:
        f"{STUDENT_DIR}/benchmark.tsv"
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
