# The Airflow image docker-compose.yml runs: the official one, plus every package the DAGs import,
# pinned in requirements.txt (the way Airflow's docs extend the image; _PIP_ADDITIONAL_REQUIREMENTS
# would reinstall them at every container start). The DAGs, plugins and SQL are mounted, not copied.
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /requirements.txt
