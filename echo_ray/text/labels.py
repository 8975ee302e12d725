"""The CheXpert label set and label values: the one home of the 14 observation names, the
CheXpert-5 subset, the label hierarchy and the regions of a normalized report.

Plain constants (no imports): everything that names a label imports it from here.
"""

from __future__ import annotations

# The 14 CheXpert observations, in the CheXpert / MIMIC-CXR-JPG column order.
# This tuple is the one home of the label list: everything else imports it.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# The 5 competition labels of CheXpert (CheXpert-5 F1).
CHEXPERT5_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

# CheXpert's label hierarchy, parent -> children. The labeler (hierarchy=True) lets a child
# fill an unmentioned parent; the synthetic ground truth applies it the same way.
LABEL_HIERARCHY: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Edema", "Consolidation", "Pneumonia", "Lung Lesion", "Atelectasis"),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
}

# CheXpert label values.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0  # "not mentioned" is None

# Regions of a normalized report, in the fixed order every normalized report follows.
REGIONS: tuple[str, ...] = (
    "thorax",
    "mediastinum",  # mediastinum / trachea
    "lungs",
    "vasculature",
    "heart",
    "hila",
    "diaphragm",  # diaphragm / costophrenic angles / pleural spaces
    "bones",
    "devices",
)
