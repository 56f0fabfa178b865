
F
seed-container-stop2label:role=kafka"
scenarios1º