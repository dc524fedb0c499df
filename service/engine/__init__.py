"""The serving engine: one object per worker process (`Engine`) that does all the work of a request
(admission, the model version, decoding, batching, inference, deadlines). The edges (service/edges/) only
translate protocols into `Engine.classify` calls and its results back."""
