// Command istio-judge runs Istio's own code on what we render, where istioctl has no command for it.
//
//	istio-judge xds < input.json     istiod's generated listeners, clusters and routes per proxy (xds.go)
//	istio-judge analyze FILE...      every istioctl analyzer, Pods and Services in the files included (analyze.go)
package main

import (
	"fmt"
	"os"

	"istio.io/istio/pkg/log"
)

const usage = "usage: istio-judge xds < input.json | istio-judge analyze FILE..."

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	// Istio logs to stdout by default; stdout is for our JSON. Its errors and warnings go to stderr.
	options := log.DefaultOptions()
	options.OutputPaths = []string{"stderr"}
	for _, scope := range log.Scopes() {
		options.SetDefaultOutputLevel(scope.Name(), log.WarnLevel)
	}
	if err := log.Configure(options); err != nil {
		fmt.Fprintln(os.Stderr, "istio-judge: configuring Istio's logging:", err)
		os.Exit(1)
	}
	var err error
	switch os.Args[1] {
	case "xds":
		err = runXDS()
	case "analyze":
		err = runAnalyze(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n%s\n", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "istio-judge:", err)
		os.Exit(1)
	}
}
