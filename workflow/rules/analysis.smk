# Feature-map analysis: metrics of every trained model (teacher and every student, every seed),
# the most-affected stages and channels and diagnostic figures per teacher → student pair, and
# per dataset the metric × method tables and correlations.


rule extract_features_metrics:
    input:
        weights=analysed_weights,
        run=f"{RESULTS}/{{dataset}}/{{model}}/metrics.json",
    output:
        channels=f"{FEATURES_DIR}/channels.parquet",
        stages=f"{FEATURES_DIR}/stages.csv",
    log:
        f"{LOG_DIR}/{{dataset}}/features/{{model}}.log",
    # one small job per model: a SLURM run submits them in groups (profiles/slurm)
    group:
        "features"
    conda:
        "../envs/kdbench.yaml"
    threads: ANALYSIS["threads"]
    params:
        data=data_params,
        n_images=ANALYSIS["n_images"],
        checkpoint=ANALYSIS["checkpoint"],
        batch_size=ANALYSIS["batch_size"],
    script:
        "../scripts/extract_features_metrics.py"


rule most_affected:
    input:
        channels=pair_channel_tables,
    output:
        table=report(
            f"{PAIR_DIR}/most_affected.csv",
            caption="../report/most_affected.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "most-affected stages and channels (table)"},
        ),
        stages_plot=report(
            f"{PAIR_DIR}/affected_stages.png",
            caption="../report/most_affected.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "most-affected stages"},
        ),
        channels_plot=report(
            f"{PAIR_DIR}/affected_channels.png",
            caption="../report/most_affected.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "most-affected channels"},
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/analysis/most_affected-{{teacher}}-{{student}}.log",
    conda:
        "../envs/kdbench.yaml"
    threads: ANALYSIS["threads"]
    params:
        top_k=ANALYSIS["top_k"],
    script:
        "../scripts/most_affected.py"


rule diagnose:
    input:
        unpack(diagnosed_models),
        affected=f"{PAIR_DIR}/most_affected.csv",
    output:
        attention=report(
            f"{PAIR_DIR}/diagnostics/attention.png",
            caption="../report/attention.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "attention maps"},
        ),
        spectra=report(
            f"{PAIR_DIR}/diagnostics/spectra.png",
            caption="../report/spectra.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "Fourier spectra"},
        ),
        changed_spectra=report(
            f"{PAIR_DIR}/diagnostics/changed_spectra.png",
            caption="../report/changed_spectra.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "spectra of the most-affected channels"},
        ),
        histograms=report(
            f"{PAIR_DIR}/diagnostics/histograms.png",
            caption="../report/histograms.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "activation histograms"},
        ),
        channels=report(
            f"{PAIR_DIR}/diagnostics/channels.png",
            caption="../report/channels.rst",
            category="Feature analysis",
            subcategory="{dataset}: {teacher} → {student}",
            labels={"figure": "channel grids"},
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/analysis/diagnose-{{teacher}}-{{student}}.log",
    conda:
        "../envs/kdbench.yaml"
    threads: ANALYSIS["threads"]
    params:
        data=data_params,
        checkpoint=ANALYSIS["checkpoint"],
        n_images=ANALYSIS["n_images"],
        batch_size=ANALYSIS["batch_size"],
        images=ANALYSIS["images"],
        tau=ANALYSIS["tau"],
        spectra_channels=ANALYSIS["spectra_channels"],
    script:
        "../scripts/diagnose.py"


rule analyse_features:
    input:
        stages=dataset_stage_tables,
    output:
        summary=f"{ANALYSIS_DIR}/stage_metrics.csv",
        table=report(
            f"{ANALYSIS_DIR}/metric_table.csv",
            caption="../report/metric_table.rst",
            category="Feature analysis",
            subcategory="{dataset}",
            labels={"figure": "metric × method per stage"},
        ),
        correlations=f"{ANALYSIS_DIR}/correlations.csv",
        accuracy_plot=report(
            f"{ANALYSIS_DIR}/correlation_accuracy.png",
            caption="../report/correlation_accuracy.rst",
            category="Feature analysis",
            subcategory="{dataset}",
            labels={"figure": "metrics vs test accuracy"},
        ),
        metrics_plot=report(
            f"{ANALYSIS_DIR}/correlation_metrics.png",
            caption="../report/correlation_metrics.rst",
            category="Feature analysis",
            subcategory="{dataset}",
            labels={"figure": "correlations between metrics"},
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/analysis/analyse_features.log",
    conda:
        "../envs/kdbench.yaml"
    threads: ANALYSIS["threads"]
    script:
        "../scripts/analyse_features.py"
