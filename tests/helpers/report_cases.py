"""Radiologist-style report texts shared by the text tests (snippets written for these
tests, in MIMIC-CXR language): LABEL_CASES, the labeler's cases with their expected labels,
which are also part of the normalizer's corpus; RADIOLOGIST_CASES, the CheXpert-rule cases
by phenomenon (hedges, lists, temporal words, abbreviations, de-identification marks,
devices by name, unmentions); and MIMIC_REPORT, a whole MIMIC-CXR report."""

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
    # CheXpert: heart failure also makes Cardiomegaly uncertain.
    (
        "Findings consistent with mild congestive heart failure.",
        expected(ECM=U, CM=U, LO=P, ED=P),
    ),
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

# (category, report text, expected labels with hierarchy=True): sentences written the way
# radiologists write, by the phenomenon each one checks. Every label not listed is None.
RADIOLOGIST_CASES: list[tuple[str, str, dict[str, float | None]]] = [
    # Hedges: uncertainty cues before and after the mention, CheXpert's pre-negation
    # uncertainty ("cannot exclude", "not excluded", "cannot rule out"), "versus", "or".
    ("hedge", "Cannot exclude early pneumonia.", expected(LO=U, PN=U)),
    ("hedge", "Findings may represent atelectasis.", expected(LO=U, AT=U)),
    ("hedge", "Left basilar opacity, atelectasis versus consolidation.",
     expected(LO=P, AT=U, CO=U)),
    ("hedge", "Possible trace left pleural effusion.", expected(EFF=U)),
    ("hedge", "Right lower lobe opacity is suspicious for pneumonia.", expected(LO=P, PN=U)),
    ("hedge", "Pneumonia is not excluded.", expected(LO=U, PN=U)),
    ("hedge", "Findings are concerning for pulmonary edema.", expected(LO=U, ED=U)),
    ("hedge", "Questionable tiny right apical pneumothorax.", expected(PTX=U)),
    ("hedge", "Cannot rule out a small pneumothorax.", expected(PTX=U)),
    ("hedge", "Mild interstitial edema is suspected.", expected(LO=U, ED=U)),
    ("hedge", "Probable small bilateral effusions.", expected(EFF=U)),
    ("hedge", "Differential diagnosis includes pneumonia.", expected(LO=U, PN=U)),
    ("hedge", "Opacity in the lingula likely reflects atelectasis.", expected(LO=P, AT=P)),
    ("hedge", "Pneumonia is less likely.", expected(LO=U, PN=U)),
    ("hedge", "Blunting of the left costophrenic angle, possibly reflecting a small effusion.",
     expected(EFF=U)),
    ("hedge", "No definite pneumothorax.", expected(NF=P, PTX=N)),
    ("hedge", "Atelectasis and/or consolidation at the left base.", expected(LO=U, AT=U, CO=U)),
    ("hedge", "Correlate clinically for pneumonia.", expected(LO=U, PN=U)),
    ("hedge", "Left base opacity could be due to aspiration or pneumonia.",
     expected(LO=P, PN=U)),
    ("hedge", "Mild pulmonary vascular congestion.", expected(LO=U, ED=U)),
    ("hedge", "Right hilar fullness may be due to adenopathy versus vascular congestion.",
     expected(LO=U, ED=U)),
    ("hedge", "Pneumothorax cannot be excluded on this supine radiograph.", expected(PTX=U)),
    # An active "cannot exclude" hedges what follows it, not the finding before it.
    ("hedge", "Left lower lobe opacity, cannot exclude pneumonia.", expected(LO=P, PN=U)),
    # Lists: one negation cue covers every item of a list joined by commas / "or" / "and".
    ("list", "No focal consolidation, effusion or pneumothorax.",
     expected(NF=P, CO=N, EFF=N, PTX=N)),
    ("list", "No pneumothorax, pleural effusion, or consolidation.",
     expected(NF=P, CO=N, EFF=N, PTX=N)),
    ("list", "There is no focal consolidation, pleural effusion, pneumothorax or pulmonary edema.",
     expected(NF=P, CO=N, EFF=N, PTX=N, ED=N)),
    ("list", "No acute osseous abnormality or displaced rib fracture.", expected(NF=P, FX=N)),
    ("list", "Without evidence of pneumothorax, effusion, or focal airspace disease.",
     expected(NF=P, LO=N, EFF=N, PTX=N)),
    ("list", "Free of focal consolidation, effusion, and pneumothorax.",
     expected(NF=P, CO=N, EFF=N, PTX=N)),
    ("list", "Bilateral effusions and bibasilar atelectasis.", expected(LO=P, AT=P, EFF=P)),
    ("list", "Cardiomegaly, pulmonary edema, and bilateral pleural effusions.",
     expected(ECM=P, CM=P, LO=P, ED=P, EFF=P)),
    ("list", "No focal consolidation, suspicious pulmonary opacity, large pleural effusion, "
     "or pneumothorax is identified.", expected(NF=P, LO=N, CO=N, EFF=N, PTX=N)),
    ("list", "Lungs are clear without consolidation, effusion, or edema.",
     expected(NF=P, LO=N, CO=N, PN=N, ED=N, EFF=N)),
    ("list", "No pleural effusion or pneumothorax. Mild cardiomegaly.",
     expected(ECM=P, CM=P, EFF=N, PTX=N)),
    ("list", "No nodules, masses, or adenopathy.", expected(NF=P, LL=N)),
    # Temporal words: resolved / removed negate, unchanged / stable / persistent / new /
    # improved / worsened keep the finding, "no new X" is uncertain (CheXpert).
    ("temporal", "Interval resolution of the right pneumothorax.", expected(NF=P, PTX=N)),
    ("temporal", "The left pleural effusion has resolved.", expected(NF=P, EFF=N)),
    ("temporal", "Unchanged small left pleural effusion.", expected(EFF=P)),
    ("temporal", "New right upper lobe consolidation.", expected(LO=P, CO=P)),
    ("temporal", "No new consolidation.", expected(LO=U, CO=U)),
    ("temporal", "No new area of consolidation.", expected(LO=U, CO=U)),
    ("temporal", "Small left effusion with no new consolidation.", expected(LO=U, CO=U, EFF=P)),
    ("temporal", "Stable cardiomegaly.", expected(ECM=P, CM=P)),
    ("temporal", "Heart size is unchanged.", expected(ECM=U, CM=U)),
    ("temporal", "Mediastinal contours are stable.", expected(ECM=U)),
    ("temporal", "Pulmonary edema has improved.", expected(LO=P, ED=P)),
    ("temporal", "The pneumothorax is no longer seen.", expected(NF=P, PTX=N)),
    ("temporal", "Persistent left lower lobe atelectasis.", expected(LO=P, AT=P)),
    ("temporal", "Worsening bilateral pleural effusions.", expected(EFF=P)),
    ("temporal", "Decreased right pleural effusion.", expected(EFF=P)),
    ("temporal", "Resolved left lower lobe pneumonia.", expected(NF=P, PN=N)),
    ("temporal", "Interval removal of the right chest tube.", expected(NF=P, SD=N)),
    ("temporal", "The endotracheal tube has been removed.", expected(NF=P, SD=N)),
    ("temporal", "Previously seen nodule is no longer visualized.", expected(NF=P, LL=N)),
    # Abbreviations.
    ("abbreviation", "ETT 5 cm above the carina.", expected(NF=P, SD=P)),
    ("abbreviation", "NGT tip in the stomach.", expected(NF=P, SD=P)),
    ("abbreviation", "OGT tip in the stomach.", expected(NF=P, SD=P)),
    ("abbreviation", "Small right PTX.", expected(PTX=P)),
    ("abbreviation", "No PTX.", expected(NF=P, PTX=N)),
    ("abbreviation", "Findings c/w CHF.", expected(ECM=U, CM=U, LO=P, ED=P)),
    ("abbreviation", "B/l pleural effusions.", expected(EFF=P)),
    ("abbreviation", "S/p CABG with intact sternotomy wires.", expected(NF=P, SD=P)),
    ("abbreviation", "R IJ CVC tip in the SVC.", expected(NF=P, SD=P)),
    ("abbreviation", "RLL PNA.", expected(LO=P, PN=P)),
    ("abbreviation", "LLL atelectasis vs PNA.", expected(LO=U, AT=U, PN=U)),
    ("abbreviation", "Tiny b/l effusions, L>R.", expected(EFF=P)),
    ("abbreviation", "ETT and NGT removed.", expected(NF=P, SD=N)),
    ("abbreviation", "No ptx or effusion.", expected(NF=P, PTX=N, EFF=N)),
    ("abbreviation", "Small L effusion w/ adjacent atx.", expected(LO=P, AT=P, EFF=P)),
    ("abbreviation", "No evidence of CHF.", expected(NF=P, ED=N)),
    # De-identification marks: "XXXX" (Open-i) and "___" (MIMIC-CXR) are opaque words.
    ("deid", "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
     expected(NF=P, ECM=N, CM=N, LO=N, ED=N, CO=N, PN=N)),
    ("deid", "XXXX sternotomy wires are intact.", expected(NF=P, SD=P)),
    ("deid", "Heart size within normal limits. No focal airspace disease. No pneumothorax or "
     "effusion.", expected(NF=P, CM=N, LO=N, PTX=N, EFF=N)),
    ("deid", "Calcified granuloma in the right XXXX. Lungs otherwise clear.",
     expected(LO=N, ED=N, CO=N, PN=N)),
    ("deid", "Comparison ___. Small left effusion, unchanged since ___.", expected(EFF=P)),
    ("deid", "Right ___ catheter tip in the SVC.", expected(NF=P, SD=P)),
    ("deid", "Opacity in the XXXX lobe, concerning for pneumonia.", expected(LO=P, PN=U)),
    ("deid", "XXXX. No pleural effusion.", expected(NF=P, EFF=N)),
    ("deid", "Stable XXXX opacity in the right lung base. No XXXX pneumothorax.",
     expected(LO=P, PTX=N)),
    ("deid", "Dr. ___ was notified of the new right pneumothorax at ___ on ___.",
     expected(PTX=P)),
    ("deid", "No pneumothorax. ___ pleural effusion is unchanged.", expected(PTX=N, EFF=P)),
    ("deid", "Nodular opacity in the XXXX, XXXX granuloma.", expected(LO=P, LL=P)),
    # Support devices by name. Sternotomy wires are devices (the synthetic archive counts
    # them); surgical clips are not (CheXpert's list has no "clip"), so a report of clips
    # alone is No Finding.
    ("device", "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
     expected(NF=P, SD=P)),
    ("device", "Left-sided AICD in place.", expected(NF=P, SD=P)),
    ("device", "Dual-chamber ICD with leads terminating in the RA and RV.", expected(NF=P, SD=P)),
    ("device", "Right PICC tip at the cavoatrial junction.", expected(NF=P, SD=P)),
    ("device", "Endotracheal tube tip 4 cm above the carina.", expected(NF=P, SD=P)),
    ("device", "ET tube in good position.", expected(NF=P, SD=P)),
    ("device", "NG tube courses below the diaphragm.", expected(NF=P, SD=P)),
    ("device", "OG tube tip in the stomach.", expected(NF=P, SD=P)),
    ("device", "Enteric tube courses below the diaphragm.", expected(NF=P, SD=P)),
    ("device", "Median sternotomy wires are intact.", expected(NF=P, SD=P)),
    ("device", "Surgical clips in the right upper quadrant.", expected(NF=P)),
    ("device", "Cholecystectomy clips. Lungs are clear.", expected(NF=P, LO=N, ED=N, CO=N, PN=N)),
    ("device", "Right chest tube in place. No pneumothorax.", expected(NF=P, PTX=N, SD=P)),
    ("device", "Tracheostomy tube in standard position.", expected(NF=P, SD=P)),
    ("device", "Dobhoff tube tip in the stomach.", expected(NF=P, SD=P)),
    ("device", "Left subclavian Port-A-Cath tip in the SVC.", expected(NF=P, SD=P)),
    ("device", "No lines or tubes.", expected(NF=P, SD=N)),
    ("device", "Pacer wires are intact.", expected(NF=P, SD=P)),
    ("device", "Right IJ line tip in the low SVC.", expected(NF=P, SD=P)),
    ("device", "Defibrillator pads overlie the chest.", expected(NF=P, SD=P)),
    ("device", "Pacemaker leads terminate in the heart.", expected(NF=P, SD=P)),
    # Unmention phrases veto an overlapping mention; the finding they name may still be one
    # outside the 14 labels, which blocks No Finding.
    ("unmention", "Small pericardial effusion.", expected()),
    ("unmention", "Calcified nodule in the left upper lobe.", expected()),
    ("unmention", "Subcutaneous edema along the right chest wall.", expected()),
    ("unmention", "Apical pleural scarring.", expected(PO=P)),
    ("unmention", "Pulmonary contusion in the left lower lobe.", expected()),
]
