"""DICOM files and datasets, without networking: the header scan that every ingest path
validates with (header), Part 10 framing (part10), transfer syntax conversion (transcode),
attribute coercion for corrected outgoing objects (coercion) and IOCM rejection notes (kos).

The archive core uses these and nothing else of DICOM; the network layer (pacsgrid.dicom:
upper layer, DIMSE, the server and client) is a front end on top of it.
"""
