"""Fuzzing the DICOM decoders (atheris, coverage-guided) and the DICOM port (PDU sequences)."""
