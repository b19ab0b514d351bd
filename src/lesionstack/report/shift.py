"""The train-vs-test score table of the report, read from score_shift.json (written by the predict stage).

It answers one question: do the scores the test set gets look like the out-of-fold scores the stacker
was trained on? Each row is one score; each cell a median with its interquartile range, and beside each
test column the Kolmogorov-Smirnov statistic against the OOF (0 = the same distribution, 1 = no overlap).
"""

from __future__ import annotations

from typing import Any

from lesionstack.report import html as h

FEATURE_NAMES = {"cnn_score": "CNN score (stacker input)",
                 "cnn_score_over_patient_mean": "CNN score / the patient's mean (stacker input)",
                 "cnn_score_pnorm": "CNN score, z-score within the patient (stacker input)",
                 "cnn_score_patient_rank": "CNN score, rank within the patient (stacker input)"}


def shift_table(shift: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per score, OOF median [IQR], then test median [IQR] and KS without and with pairing."""
    named = {FEATURE_NAMES.get(name, f"{name} (stacker input)"): v for name, v in shift["features"].items()}
    named |= {"Stacker probability, one fold model": shift["stack_fold_probability"],
              "Stacker probability, mean of fold models (submitted)": shift["stack_final_probability"]}

    def spread(d: dict[str, Any]) -> str:
        q = d["quantiles"]
        return f"{q['q50']:.3g} [{q['q25']:.3g} to {q['q75']:.3g}]"

    rows = [[name, spread(d["oof"]), spread(d["test_mean"]), f"{d['test_mean']['ks']:.3f}",
             spread(d["test_paired"]), f"{d['test_paired']['ks']:.3f}"] for name, d in named.items()]
    header = ["Score", "Training, out-of-fold: median [quartiles]",
              "Test, CNN averaged over folds: median [quartiles]", "shift (KS)",
              "Test, stack fold k on CNN fold k: median [quartiles]", "shift (KS)"]
    return header, rows


def shift_part(shift: dict[str, Any]) -> list[str]:
    """The report's sub-section: the table, then how to read it."""
    header, rows = shift_table(shift)
    by_fold = ", ".join(f"fold {k}: {v['ks_mean']:.3f} → {v['ks_paired']:.3f}"
                        for k, v in shift["cnn_score_by_fold"].items())
    return ["<h3>Do test scores look like training scores? (test set, no labels needed)</h3>",
            h.table(header, rows),
            h.paragraph(
                f"Each cell: the median score and, in brackets, the middle half of the scores (25th to 75th "
                f"percentile), over the {shift['n_test']} test lesions or the training lesions' out-of-fold "
                "scores. 'shift (KS)' is the Kolmogorov-Smirnov statistic of that test column against the "
                "training column: 0 means the same distribution, 1 no overlap; below about 0.1 is a small "
                "shift. The two test columns differ in how the CNN score given to the stacker is made: "
                "averaged over the CNN fold models (each training lesion's OOF score came from one model, so "
                "the average is narrower), or paired, stack fold k fed by CNN fold k (what predict does). "
                "Pairing should bring the shift down. The submitted probability is a mean over the stacker's "
                "folds, so it is narrower than one fold model's either way; the metric uses only its ranking."),
            h.paragraph(f"CNN fold k's own OOF scores against its test scores, KS averaged → paired: {by_fold}.")]
