
0

seed-limit*/app"
scenarios1Ê€€€ 