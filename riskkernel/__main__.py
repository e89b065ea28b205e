from riskkernel.cli import main

main()
