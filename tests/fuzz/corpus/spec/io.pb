
1
seed-io*/app"
scenarios1¢	€€@8:0