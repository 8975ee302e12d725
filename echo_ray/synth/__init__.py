"""Synthetic chest X-ray archive: phantom radiographs, radiologist-style reports, labels.

The project's embedded data set for quickstart, tests and benchmarks (no real CXR data can be
downloaded here). A study is drawn as a spec (no pixels), then rendered, reported and encoded;
each part works alone (tests render one study with and without a finding).

  findings.py        finding types, grades and size ranges; Finding, Anatomy, StudySpec;
                     chexpert_labels (the labels the true findings imply)
  grammar.py         the report grammar: template tables, SLOT_VALUES, report_templates,
                     template_regex, is_well_formed
  streams.py         named random streams (_rng) and the draws every module uses
  sampling.py        sample_finding, sample_study, fake patient identities (Subject)
  report.py          report_sentences and write_report: a spec's MIMIC-style report text
  canvas.py          drawing in canonical chest coordinates: _Frame, _Layer, soft masks,
                     splines, blur
  chest.py           the chest outline: lungs, diaphragm, heart, mediastinum; heart_width
  render.py          render_view: one view through the detector model
  render_frontal.py  the PA / AP view (anatomy, opacities, vessels, bones, devices)
  render_lateral.py  the lateral view
  dicom_writer.py    write_dicom and make_uid: arrays -> DICOM bytes in any TRANSFER_SYNTAXES
  encode.py          encode_view: a rendered view -> DICOM with a drawn syntax and header
  archive.py         plan_archive and synthesize_archive: the MIMIC-CXR layout on disk

May import echo_ray.data and echo_ray.text (today only text.labels), numpy, Pillow, and
pydicom (dicom_writer only); nothing from model, decode, train or any later layer.
Underscored helpers (_rng, _Frame, ...) are shared between these modules only. Importers use
the defining module; nothing is re-exported here.
"""
