"""Radiologist-style report texts shared by the text tests (snippets written for these
tests, in MIMIC-CXR language): LABEL_CASES, the labeler's cases with their expected labels,
which are also part of the normalizer's corpus, and MIMIC_REPORT, a whole MIMIC-CXR report."""

from __future__ import annotations

from echo_ray.text.labels import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

P, N, U = POSITIVE, NEGATIVE, UNCERTAIN
SHORT = {
    "NF": "No Finding",
    "ECM": "Enlarged Cardiomediastinum",
    "CM": "Cardiomegaly",
    "LO": "Lung Opacity",
    "LL": "Lung Lesion",
    "ED": "Edema",
    "CO": "Consolidation",
    "PN": "Pneumonia",
    "AT": "Atelectasis",
    "PTX": "Pneumothorax",
    "EFF": "Pleural Effusion",
    "PO": "Pleural Other",
    "FX": "Fracture",
    "SD": "Support Devices",
}


def expected(**short: float) -> dict[str, float | None]:
    out: dict[str, float | None] = dict.fromkeys(CHEXPERT_LABELS)
    out.update({SHORT[k]: v for k, v in short.items()})
    return out


# (report text, expected labels with hierarchy=True). Every label not listed is None.
LABEL_CASES: list[tuple[str, dict[str, float | None]]] = [
    (
        "Heart size is mildly enlarged. There is a small left pleural effusion with adjacent "
        "atelectasis. No pneumothorax.",
        expected(ECM=P, CM=P, LO=P, AT=P, PTX=N, EFF=P),
    ),
    (
        "ET tube terminates 4 cm above the carina. NG tube courses below the diaphragm.",
        expected(NF=P, SD=P),
    ),
    (
        "Lungs are clear without focal consolidation, effusion, or pneumothorax.",
        expected(NF=P, LO=N, ED=N, CO=N, PN=N, PTX=N, EFF=N),
    ),
    (
        "Right lower lobe opacity, may reflect atelectasis, though pneumonia cannot be excluded.",
        expected(LO=P, AT=U, PN=U),
    ),
    ("Interval resolution of the previously seen right effusion.", expected(NF=P, EFF=N)),
    ("No acute cardiopulmonary process.", expected(NF=P, ED=N, CO=N, PN=N, PTX=N)),
    ("The cardiomediastinal silhouette is normal.", expected(NF=P, ECM=N, CM=N)),
    ("Normal cardiomediastinal silhouette.", expected(NF=P, ECM=N, CM=N)),
    ("Heart size is top normal.", expected(NF=P, CM=N)),
    ("Heart size is borderline enlarged.", expected(ECM=U, CM=U)),
    ("Heart size is normal to mildly enlarged.", expected(ECM=U, CM=U)),
    (
        "Moderate cardiomegaly with pulmonary vascular congestion and small bilateral pleural "
        "effusions.",
        expected(ECM=P, CM=P, LO=U, ED=U, EFF=P),
    ),
    (
        "Mild pulmonary edema has improved. Stable moderate cardiomegaly.",
        expected(ECM=P, CM=P, LO=P, ED=P),
    ),
    ("No change in the moderate right pleural effusion.", expected(EFF=P)),
    ("Left retrocardiac opacity, atelectasis versus pneumonia.", expected(LO=P, AT=U, PN=U)),
    (
        "The right pneumothorax has resolved and the right chest tube has been removed.",
        expected(NF=P, PTX=N, SD=N),
    ),
    ("There is no pneumothorax, and a small left effusion is present.", expected(PTX=N, EFF=P)),
    ("No focal consolidation is seen to suggest pneumonia.", expected(NF=P, CO=N, PN=N)),
    ("Healed right rib fractures. No acute fracture.", expected(FX=P)),
    (
        "Left-sided pacemaker with leads terminating in the right atrium and right ventricle. "
        "Median sternotomy wires are intact.",
        expected(NF=P, SD=P),
    ),
    (
        # A granuloma is a finding outside the 14: No Finding stays blank (CheXpert).
        "Calcified granuloma in the right upper lobe. The lungs are otherwise clear.",
        expected(LO=N, ED=N, CO=N, PN=N),
    ),
    (
        "Blunting of the right costophrenic angle, which may reflect a small effusion or "
        "pleural thickening.",
        expected(EFF=U, PO=U),
    ),
    (
        "Heart size and mediastinal contours are normal. No pleural effusion or pneumothorax.",
        expected(NF=P, ECM=N, CM=N, PTX=N, EFF=N),
    ),
    ("Possible small left pleural effusion. No pneumothorax.", expected(EFF=U, PTX=N)),
    ("No pneumothorax, possible small left pleural effusion.", expected(EFF=U, PTX=N)),
    (
        "The lungs are clear except for mild bibasilar atelectasis.",
        expected(LO=P, ED=N, CO=N, PN=N, AT=P),
    ),
    (
        "There is no evidence of pneumonia, although atelectasis may be present at the left base.",
        expected(LO=U, PN=N, AT=U),
    ),
    (
        "Right IJ central venous catheter terminates in the mid SVC. The left PICC has been "
        "removed.",
        expected(NF=P, SD=P),
    ),
    (
        "There is a 1.5 cm nodular opacity in the left upper lobe, concerning for malignancy.",
        expected(LO=P, LL=P),
    ),
    ("Multifocal consolidations concerning for pneumonia.", expected(LO=P, CO=P, PN=U)),
    (
        "No pleural effusion, pneumothorax, or focal consolidation is present.",
        expected(NF=P, CO=N, PTX=N, EFF=N),
    ),
    (
        "There is mild pulmonary vascular congestion without overt pulmonary edema.",
        expected(LO=U, ED=U),
    ),
    ("Pulmonary edema has nearly resolved.", expected(LO=P, ED=P)),
    ("The previously noted left lower lobe consolidation has cleared.", expected(NF=P, CO=N)),
    ("Subsegmental atelectasis at the left lung base.", expected(LO=P, AT=P)),
    ("Plate-like atelectasis at both lung bases.", expected(LO=P, AT=P)),
    ("Plate and screw fixation of the right clavicle.", expected(NF=P, SD=P)),
    ("Small left apical pneumothorax is slightly smaller than on ___.", expected(PTX=P)),
    ("Hyperinflated lungs consistent with COPD. No focal consolidation.", expected(CO=N)),
    ("Mild cardiomegaly is unchanged.", expected(ECM=P, CM=P)),
    ("The heart is normal in size.", expected(NF=P, CM=N)),
    ("Small left effusion, not significantly changed.", expected(EFF=P)),
    ("Pneumothorax cannot be ruled out.", expected(PTX=U)),
    ("Right pleural effusion is not excluded.", expected(EFF=U)),
    (
        "Increased opacity at the right base could reflect atelectasis, aspiration, or pneumonia.",
        expected(LO=P, AT=U, PN=U),
    ),
    ("No large pleural effusion.", expected(NF=P, EFF=N)),
    ("No signs of pneumonia.", expected(NF=P, PN=N)),
    ("Mediastinal contours are unremarkable, and the heart is enlarged.", expected(ECM=N, CM=P)),
    ("The mediastinum is widened.", expected(ECM=P)),
    ("Enlarged cardiomediastinal silhouette.", expected(ECM=P)),
    ("Stable appearance of the cardiomediastinal silhouette.", expected(ECM=U)),
    ("Mildly displaced fracture of the left clavicle.", expected(FX=P)),
    ("Moderate right pleural effusion has increased in size since ___.", expected(EFF=P)),
    ("There is a moderate hiatal hernia.", expected()),
    ("No pulmonary nodules or masses are seen.", expected(NF=P, LL=N)),
    (
        "New left basilar opacity is likely atelectasis, though pneumonia is possible in the "
        "appropriate clinical setting.",
        expected(LO=P, AT=P, PN=U),
    ),
    ("Findings consistent with mild congestive heart failure.", expected(LO=P, ED=P)),
    ("Left lower lobe collapse.", expected(LO=P, AT=P)),
    ("Interval removal of the endotracheal tube. No pneumothorax.", expected(NF=P, PTX=N, SD=N)),
    ("Swan-Ganz catheter tip in the right pulmonary artery.", expected(NF=P, SD=P)),
    (
        "Patchy opacity in the right lower lobe may represent early pneumonia.",
        expected(LO=P, PN=U),
    ),
    ("Severe degenerative changes of the thoracic spine.", expected()),
    (
        "Diffuse interstitial opacities with Kerley B lines, consistent with interstitial edema.",
        expected(LO=P, ED=P),
    ),
    (
        "Bilateral pleural thickening and calcified pleural plaques, consistent with prior "
        "asbestos exposure.",
        expected(PO=P),
    ),
    (
        "There is a right-sided chest tube with a tiny residual apical pneumothorax.",
        expected(PTX=P, SD=P),
    ),
    ("Lung volumes are low. Possible retrocardiac opacity.", expected(LO=U)),
    ("The lungs are free of consolidation or effusion.", expected(NF=P, CO=N, EFF=N)),
    ("There is a ___ cm nodule in the right upper lobe, unchanged from ___.", expected(LO=P, LL=P)),
    ("Heart size is stable.", expected(ECM=U, CM=U)),
    ("No evidence of new focal consolidation.", expected(NF=P, CO=N)),
    ("Questionable small left pleural effusion.", expected(EFF=U)),
    ("Lines and tubes are unchanged in position.", expected(NF=P, SD=P)),
    ("No lines or tubes are present.", expected(NF=P, SD=N)),
    ("Blunting of the costophrenic angles is likely due to small effusions.", expected(EFF=P)),
    ("", expected(NF=None)),
]

# A whole MIMIC-CXR report: title, wet read, administrative sections, numbered impression,
# two addenda.
MIMIC_REPORT = """                                 FINAL REPORT
 WET READ: ___ ___ ___ 9:14 PM
  Small left pleural effusion.  No pneumothorax.
 ______________________________________________________________________________
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___ year old man with dyspnea  // ? effusion

 COMPARISON:  Chest radiograph from ___.

 FINDINGS:

 Heart size is mildly enlarged.  There is a small left pleural effusion with
 adjacent atelectasis.  No pneumothorax.  Dr. ___ was paged at 9:15 pm on ___.

 IMPRESSION:

 1. Small left pleural effusion with adjacent atelectasis.
 2. Mild cardiomegaly.

 RECOMMENDATION(S):  Follow-up radiograph after diuresis.

 ADDENDUM:
 On review, there is also a healed right rib fracture.

 ADDENDUM
 The PICC line was not included on the image.
"""
