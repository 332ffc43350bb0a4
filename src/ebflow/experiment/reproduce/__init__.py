"""Reproducing the paper's tables (``ebflow reproduce``): the tables' cells (``tables``), running
them (``cells``) and the report (``report``)."""
