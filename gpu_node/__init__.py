"""The GPU node app: the AUTOMATIC1111 API, per-user options, the job queue and its worker."""
