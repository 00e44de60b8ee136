/** OHIF v3 configuration served by `spinemed-node viewer` (replaces the dist's own app-config.js).
 *
 * OHIF and Orthanc's DICOMweb plugin share one origin: nginx serves OHIF and proxies /dicom-web and /wado
 * to Orthanc (Orthanc 1.10 sends no CORS headers). The roots are therefore built from the page's own
 * origin, so the same file works on any host name and port.
 *
 * Nothing here loads from outside this origin: no remote customizations, no dynamic config, no
 * service worker, no analytics.
 */
(function () {
  var origin = window.location.origin;

  window.config = {
    name: 'spinemed-node viewer',
    routerBasename: '/',
    extensions: [],
    modes: [],
    // no onboarding tour over the images
    customizationService: {
      'ohif.tours': { $set: [] },
    },
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: false,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    groupEnabledModesFirst: true,
    investigationalUseDialog: { option: 'never' },
    maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'Orthanc (spinemed-node)',
          name: 'orthanc',
          wadoUriRoot: origin + '/wado',
          qidoRoot: origin + '/dicom-web',
          wadoRoot: origin + '/dicom-web',
          qidoSupportsIncludeField: false,
          supportsReject: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          singlepart: 'bulkdata,video',
          bulkDataURI: { enabled: true, relativeResolution: 'studies' },
          omitQuotationForMultipartRequest: true,
        },
      },
    ],
    httpErrorHandler: function (error) {
      console.warn('DICOMweb request failed', error && error.status);
    },
  };
})();
