
U
seed-partition	lab-kafka"
scenarios1R"
 
eth0198.18.0.0/24„G"tcp(