# Teachers: one per dataset × architecture × teacher seed, trained with the seed protocol and
# label smoothing (REFERENCE §3).


rule train_teacher:
    output:
        metrics=f"{TEACHER_DIR}/metrics.json",
        final_weights=f"{TEACHER_DIR}/model_final.pt",
        best_weights=f"{TEACHER_DIR}/model_best.pt",
        loss_plot=report(
            f"{TEACHER_DIR}/Loss.png",
            caption="../report/loss_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "teacher {arch}",
                "method": "teacher",
                "seed": "{seed}",
            },
        ),
        accuracy_plot=report(
            f"{TEACHER_DIR}/Accuracy.png",
            caption="../report/accuracy_curve.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "teacher {arch}",
                "method": "teacher",
                "seed": "{seed}",
            },
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/teachers/{{arch}}-seed{{seed}}.log",
    benchmark:
        f"{TEACHER_DIR}/benchmark.tsv"
    # before the jobs that do not wait for it: every taught student waits for its teacher
    priority: 10
    conda:
        "../envs/kdbench.yaml"
    threads: TRAIN_THREADS
    # one training run's share of a GPU: `--resources gpu_runs=N` lets N run at once
    resources:
        gpu_runs=1,
    params:
        data=data_params,
        train=kdconfig.train_params(config, "teacher"),
        method_params={"label_smoothing": TEACHER["label_smoothing"]},
        state=f"{STATE_DIR}/{{dataset}}/teachers/{{arch}}/seed{{seed}}.pt",
    script:
        "../scripts/train_teacher.py"
