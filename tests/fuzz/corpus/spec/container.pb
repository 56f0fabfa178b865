
;
seed-container2kafka"
scenarios1ºSIGKILL