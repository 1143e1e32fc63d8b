// analyze: every analyzer of `istioctl analyze`, run on files that also hold the cluster's runtime objects.
//
// `istioctl analyze --use-kube=false` reads Istio's config from files but drops Pods, Services, Namespaces
// and the like from them (kuberesource.DefaultExcludedSchemas), so every analyzer that needs one of those
// is skipped offline: a VirtualService to a host with no Service, a Gateway selector matching no pod, an
// AuthorizationPolicy selecting nothing go unreported. Istio's own analyzer tests load files with
// AddTestReaderKubeSource, which keeps them; this does the same, then analyzes as istioctl does
// (AddDefaultResources, all analyzers, istio-system as Istio's namespace) and prints the messages as
// istioctl's `-o json` does. Analyzers that still cannot run are printed on stderr.
package main

import (
	"fmt"
	"os"

	"istio.io/istio/istioctl/pkg/util/formatting"
	"istio.io/istio/pkg/config/analysis/analyzers"
	"istio.io/istio/pkg/config/analysis/local"
)

func runAnalyze(files []string) error {
	if len(files) == 0 {
		return fmt.Errorf("analyze: expected at least one YAML file")
	}
	analyzer := local.NewSourceAnalyzer(analyzers.AllCombined(), "", "istio-system", nil)
	readers := make([]local.ReaderSource, 0, len(files))
	for _, name := range files {
		file, err := os.Open(name)
		if err != nil {
			return err
		}
		defer file.Close()
		readers = append(readers, local.ReaderSource{Name: name, Reader: file})
	}
	if err := analyzer.AddTestReaderKubeSource(readers); err != nil {
		return fmt.Errorf("reading %v: %w", files, err)
	}
	if err := analyzer.AddDefaultResources(); err != nil {
		return err
	}
	result, err := analyzer.Analyze(make(chan struct{}))
	if err != nil {
		return err
	}
	for _, skipped := range result.SkippedAnalyzers {
		fmt.Fprintln(os.Stderr, "skipped analyzer:", skipped)
	}
	output, err := formatting.Print(result.Messages, formatting.JSONFormat, false)
	if err != nil {
		return err
	}
	fmt.Println(output)
	return nil
}
