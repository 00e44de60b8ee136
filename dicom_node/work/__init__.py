"""Work: the analysis pipeline (select → preprocess → predict → postprocess → report) and the worker that
claims jobs, runs the pipeline, exports the results and keeps its heartbeat.
"""
