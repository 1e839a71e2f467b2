"""HL7 v2 patient updates over MLLP: the hospital's patient registry corrects the archive.

A front end like dicom/ and web/: it reads ADT messages (`adt.py`: A08 update patient
information, A40 merge patient, A47 change patient identifier), asks `Archive.corrections` to
apply them, and answers each with an ACK. The listener (`listener.py`) runs on the node that
serves the web face and background jobs (`pacsgrid serve --hl7-port N`); messages of one
connection are handled in order, and each message (by sending application, facility and
MessageControlID) is acted on at most once, also across restarts.
"""
